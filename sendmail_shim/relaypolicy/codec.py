"""Postfix's SMTP access policy delegation protocol: requests and replies.

A request is attribute lines ``name=value\\n`` ended by an empty line; the
reply is ``action=<action>\\n\\n`` (Postfix's SMTPD_POLICY_README).

Trusts: nothing; the bytes come from a socket that anyone allowed to connect
can write.
Guarantees: a request is accepted only when every line is ``name=value`` with a
name of letters, digits and ``_``, no name twice, at most
:data:`MAX_ATTRIBUTES` lines of at most :data:`MAX_LINE` bytes, valid UTF-8
without control characters, and ``request=smtpd_access_policy``; anything else
is a :class:`Malformed` whose text names the line and the problem but never a
value (values may be certificates or addresses: no secrets in logs).  The
codec never guesses: the caller closes the connection on :class:`Malformed`.
"""

from __future__ import annotations

import re

MAX_LINE = 4096  # bytes of one attribute line; Postfix's own attributes are far shorter
MAX_ATTRIBUTES = 100  # Postfix 3.7 sends about 35
MAX_REQUEST = MAX_LINE * MAX_ATTRIBUTES  # the reader's limit for one request
END = b"\n\n"
REQUEST_TYPE = "smtpd_access_policy"
_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# A well-formed request in one pass (the usual case); anything else takes the
# line-by-line path, which names the problem.
_WELL_FORMED = re.compile(rb"(?:[A-Za-z0-9_]{1,64}=[^\x00-\x1f\x7f]*\n){1,%d}\n"
                          % MAX_ATTRIBUTES)
_PAIR = re.compile(r"([A-Za-z0-9_]+)=(.*)\n")  # on a block _WELL_FORMED matched


class Malformed(ValueError):
    """Not a policy request; the text names the problem but no value."""


def parse_request(block: bytes) -> dict[str, str]:
    """The attributes of one request: ``block`` is its bytes up to and including ``\\n\\n``."""
    if len(block) <= MAX_LINE and _WELL_FORMED.fullmatch(block):
        try:
            pairs = _PAIR.findall(block[:-1].decode("utf-8"))
        except UnicodeDecodeError:
            pass  # the slow path names the line
        else:
            attrs = dict(pairs)
            if len(attrs) == len(pairs) and attrs.get("request") == REQUEST_TYPE:
                return attrs
    return _parse_slowly(block)


def _parse_slowly(block: bytes) -> dict[str, str]:
    """The same checks line by line: the attributes, or the first problem found."""
    if not block.endswith(END):
        raise Malformed("request not ended by an empty line (connection closed mid-request)")
    lines = block[:-2].split(b"\n")
    if len(lines) > MAX_ATTRIBUTES:
        raise Malformed(f"{len(lines)} attribute lines, more than {MAX_ATTRIBUTES}")
    attrs: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        if len(raw) > MAX_LINE:
            raise Malformed(f"line {number}: {len(raw)} bytes, more than {MAX_LINE}")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"line {number}: not UTF-8") from None
        name, equals, value = line.partition("=")
        if not equals:
            raise Malformed(f"line {number}: no '=' (an empty line inside a request, or not "
                            "name=value)")
        if not _NAME.fullmatch(name):
            raise Malformed(f"line {number}: attribute name is not letters, digits and _")
        if _BAD_CHARS.search(value):
            raise Malformed(f"line {number}: attribute {name} holds a control character")
        if name in attrs:
            raise Malformed(f"line {number}: attribute {name} given twice")
        attrs[name] = value
    if attrs.get("request") != REQUEST_TYPE:
        raise Malformed(f"attribute request is not {REQUEST_TYPE}")
    return attrs


def encode_reply(action: str) -> bytes:
    """``action=...`` and the empty line; the action is ours, one line, no control bytes."""
    if _BAD_CHARS.search(action) or not action:
        raise ValueError(f"not a one-line action: {action!r}")
    return b"action=" + action.encode("utf-8") + END


def encode_request(attrs: dict[str, str]) -> bytes:
    """A request as Postfix sends it (tests and bench/policy)."""
    return "".join(f"{name}={value}\n" for name, value in attrs.items()).encode("utf-8") + b"\n"


def parse_reply(block: bytes) -> str:
    """The action of a reply (tests and bench/policy)."""
    text = block.decode("utf-8")
    if not text.startswith("action=") or not text.endswith("\n\n") or text.count("\n") != 2:
        raise Malformed("reply is not action=...\\n\\n")
    return text[len("action="):-2]
