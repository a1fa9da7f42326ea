"""Header fields of a message as bytes: where the header block ends, names, values, dates.

Trusts: nothing; the bytes may be anything a site wrote.
Guarantees: the header block ends at the first line that is neither a field
(RFC 5322 ftext name and a colon) nor a continuation, as Postfix's cleanup
reads it; values are decoded without failing (invalid UTF-8 survives as
surrogates); dates are RFC 5322 in local time, as Postfix's mail_date().

Cost: the block is split in time linear in its size (one regular-expression
match per field, continuation lines included, no copying per line), so a
field of a million continuation lines costs what its bytes cost.  With
``limited=True`` (the intake) the split stops and raises
:class:`HeaderLimitError` at the first field longer than MAX_FIELD_BYTES
(Postfix's ``header_size_limit``, 102400), when the block passes
MAX_BLOCK_BYTES, or at field MAX_FIELDS + 1, before any later work sees it.
Postfix's cleanup truncates a longer header and goes on; the intake refuses
instead (552 5.3.4, exit 65, intake/compose.py): a truncated To: or Bcc:
would send to fewer (or other) recipients than the site wrote, and the site's
script learns at once.  The block and count limits (Postfix has none; sendmail
caps the block at 32 KiB) bound what every later step does with the header:
address parsing, the sender policy, signing.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

# A field starts with an ftext name, optional WSP and a colon; it ends after the
# first newline not followed by SP or HTAB (a continuation line), or at the end.
_HEADER_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_FIELD_END = re.compile(rb"\n(?![ \t])")
MAX_FIELD_BYTES = 102400  # Postfix's header_size_limit: one field with its continuations
MAX_BLOCK_BYTES = 262144  # the whole header block
MAX_FIELDS = 1000  # fields in the header block


class HeaderLimitError(ValueError):
    """The header block passes one of the limits (see the module docstring)."""


def split_header_block(message: bytes, limited: bool = False) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines and newlines) and the rest.

    ``limited``: raise :class:`HeaderLimitError` past the limits, as soon as
    the offending field is read.
    """
    headers: list[bytes] = []
    pos = 0
    while (start := _HEADER_START.match(message, pos)) is not None:
        # Limited, the search stops just past the limit: a longer field costs no more.
        window = pos + MAX_FIELD_BYTES + 2 if limited else len(message)
        found = _FIELD_END.search(message, start.end(), window)
        end = found.end() if found is not None else min(window, len(message))
        field = message[pos:end]
        if limited:
            _check_limits(field, len(headers), end)
        headers.append(field)
        pos = end
    return headers, message[pos:]  # a blank or non-header line: the body starts here


def _check_limits(field: bytes, before: int, block: int) -> None:
    name = printable_name(field)
    if len(field) > MAX_FIELD_BYTES:
        raise HeaderLimitError(f"the {name} header field is longer than {MAX_FIELD_BYTES} "
                               "bytes (header_size_limit)")
    if block > MAX_BLOCK_BYTES:
        raise HeaderLimitError(f"the header block is longer than {MAX_BLOCK_BYTES} bytes "
                               f"(at the {name} field)")
    if before >= MAX_FIELDS:
        raise HeaderLimitError(f"the header block has more than {MAX_FIELDS} fields")


def printable_name(field: bytes) -> str:
    """The field's name, made safe to show: at most 40 printable ASCII characters."""
    name = field.split(b":", 1)[0].strip()[:40]
    return "".join(chr(c) if 0x21 <= c <= 0x7E else "?" for c in name)


def header_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def header_value(field: bytes) -> str:
    value = field.split(b":", 1)[1]
    return re.sub(r"\r?\n[ \t]", " ", value.decode("utf-8", "surrogateescape")).strip()


def mail_date(when: float) -> str:
    """RFC 5322 date in local time with the zone name, as Postfix's mail_date()."""
    return f"{formatdate(when, localtime=True)} ({time.strftime('%Z', time.localtime(when))})"
