"""Header fields of a message as bytes: where the header block ends, names, values, dates.

Trusts: nothing; the bytes may be anything a site wrote.
Guarantees: the header block ends at the first line that is neither a field
(RFC 5322 ftext name and a colon) nor a continuation, as Postfix's cleanup
reads it; values are decoded without failing (invalid UTF-8 survives as
surrogates); dates are RFC 5322 in local time, as Postfix's mail_date().
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

_HEADER_START = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


def split_header_block(message: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines and newlines) and the rest."""
    headers: list[bytes] = []
    pos = 0
    while pos < len(message):
        end = message.find(b"\n", pos)
        end = len(message) if end < 0 else end + 1
        line = message[pos:end]
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1] += line
        elif _HEADER_START.match(line):
            headers.append(line)
        else:
            break  # a blank line or a non-header line: the body starts here
        pos = end
    return headers, message[pos:]


def header_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def header_value(field: bytes) -> str:
    value = field.split(b":", 1)[1]
    return re.sub(r"\r?\n[ \t]", " ", value.decode("utf-8", "surrogateescape")).strip()


def mail_date(when: float) -> str:
    """RFC 5322 date in local time with the zone name, as Postfix's mail_date()."""
    return f"{formatdate(when, localtime=True)} ({time.strftime('%Z', time.localtime(when))})"
