"""The one rule for line endings: applied at intake, on every road, before anything reads lines.

Trusts: nothing; the bytes are a site's (stdin, a socket request, a drop file,
SMTP DATA from ``-bs`` or the capture listener).
Guarantees: :func:`normalize` returns the message with LF line ends and no CR
byte at all, or raises :class:`LineEndError`; it is idempotent, so the front
end (which refuses early, exit 65, so the site's script sees the error) and
the daemon's intake (which enforces it for every road: socket, drop file,
``-bs``, capture) apply the same function.  Every later step (compose, the
sender policy, the spool, the content scan, the relay client, DKIM signing)
reads one line structure, and the relay receives exactly those lines, each
ended with CRLF (relay.py's ``smtp_data`` adds only the CR of each CRLF, and
breaks lines over 998 octets with CRLF + space, a continuation).

The rule:

* A run of CRs followed by LF, or by the end of the data, is one line end:
  CRLF (PHP, ``-bs``), CR CR LF (a script that turned LF into CRLF twice) and
  a final CR all become LF.
* The header block, here everything before the first empty line (or the whole
  message when there is none: always at least the header block compose and
  the sender policy read), may hold no other CR and no NUL: such a message is
  refused (exit 65, ``554 5.6.0``).  A CR inside a header line is how one
  header is smuggled into another: split on LF it is data inside the Subject,
  while many readers (aiosmtplib, MUAs, some MTAs) take it as a line end, and
  a naive script that strips only LF from a visitor's Subject would let the
  visitor add a Bcc if we turned it into a line end.  A NUL ends a C string:
  ``From: a@b.example\\0@site.example`` reads as the site's own domain to
  Python and as ``a@b.example`` to the relay's cleanup, OpenDKIM or a mail
  client.  RFC 5322 (2.2, 2.3) allows neither.
* In the body a lone CR (old Mac text, HTML built with ``nl2br`` and a removed
  LF) is a line end: LF.  The body is read by nobody's policy, and that is
  what the relay client made of it before; now the spool, the size, the 998
  octet breaking and a body hash see the same lines the relay does.

Postfix keeps a lone CR as data inside a line and sends it on; RFC 5321 2.3.8
says a client must not send a bare CR, and SMTP smuggling lives on such bytes:
here none ever reaches the relay.  No ``re`` and no ``__future__``: this runs on
PHP's hot path.
"""

CR = b"\r"
LF = b"\n"
NUL = b"\0"


class LineEndError(ValueError):
    """A CR or NUL inside the header block: the message is refused (65, 554 5.6.0)."""

    code = 554
    enhanced = "5.6.0"

    def __init__(self, line: int, what: str) -> None:
        super().__init__(
            f"line {line} of the header block holds {what}: header lines must end with LF "
            "or CRLF and hold no other CR and no NUL, which could hide one header in another")
        self.line = line
        self.what = what


def _line_ends(data: bytes) -> bytes:
    """Every run of CRs before an LF or the end of the data becomes one LF."""
    if data.endswith(CR):
        data = data.rstrip(CR) + LF
    for _ in range(3):  # CRLF, then CR CR LF, CR CR CR LF: one pass in C each
        data = data.replace(b"\r\n", LF)
        if b"\r\n" not in data:
            return data
    # Longer runs: line by line (linear; a Python loop over the lines).
    return LF.join([line.rstrip(CR) for line in data.split(LF)])


def header_region_end(data: bytes) -> int:
    """Offset just past the header block's last line: before the first empty line."""
    if data.startswith(LF):
        return 0
    blank = data.find(b"\n\n")
    return len(data) if blank < 0 else blank + 1


def normalize(data: bytes) -> bytes:
    """The message under the rule (module docstring), or :class:`LineEndError`."""
    if CR in data:
        data = _line_ends(data)
    end = header_region_end(data)
    for byte, what in ((CR, "a carriage return (CR) that does not end the line"),
                       (NUL, "a NUL byte")):
        at = data.find(byte, 0, end)
        if at >= 0:
            raise LineEndError(data.count(LF, 0, at) + 1, what)
    if data.find(CR, end) >= 0:
        data = data[:end] + data[end:].replace(CR, LF)
    return data
