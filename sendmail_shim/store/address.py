"""The one address grammar: what the door accepts is exactly what delivery can send.

Used by compose/intake (the door: envelope sender and recipients), by the SMTP
and LMTP clients (relay.py, local_delivery.py: MAIL FROM / RCPT TO paths) and
by bounce.py.  Pure stdlib.

Trusts: nothing; every string is hostile.
Guarantees, per RFC 5321 4.1.2 and 4.5.3.1 with RFC 6531 (SMTPUTF8):

* Mailbox = Local-part "@" Domain; Local-part = Dot-string / Quoted-string;
  Domain = dot-separated labels (letters, digits, hyphens; U-labels that IDNA
  can encode) or an address literal ``[IPv4]``, ``[IPv6:...]``;
* UTF-8 (non-ASCII) is allowed in the local part and the domain (RFC 6531: the
  message then needs SMTPUTF8 at the relay, which relay.py asks for); invalid
  UTF-8 (lone surrogates from surrogateescape), controls and DEL never are;
* local part at most 64 octets, domain at most 255, the path ``<...>`` at most
  256 (so a mailbox at most 254);
* :func:`canonical` returns the form kept in the envelope and sent on the wire:
  a quoted local part that is a valid Dot-string is unquoted (RFC 5321: quote
  only when needed), one that is not stays quoted with only ``"`` and ``\\``
  escaped.  Strings outside the grammar (``a"b"@example.net``, ``a..b@x``)
  raise :class:`AddressError` naming the address and the reason: we refuse at
  the door what the relay cannot take (Postfix would accept and quote some of
  them; a refusal makes PHP's mail() return false instead of a late bounce).
"""

from __future__ import annotations

import ipaddress

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256  # "<" mailbox ">"
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


class AddressError(ValueError):
    """Not a mailbox we can send to or from; the text names the address and why."""


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a log line, a reply or a listing: no controls, no surrogates."""
    if text.isascii() and text.isprintable():  # the common case, kept as it is (listings)
        return text if len(text) <= limit else text[:limit] + "..."
    out = []
    for ch in text[:limit]:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a raw byte kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(text) > limit else "")


def _is_utf8(ch: str) -> bool:
    """A non-ASCII character that UTF-8 can carry (not a surrogate)."""
    return ord(ch) > 0x7F and not 0xD800 <= ord(ch) <= 0xDFFF


def _atom_ok(atom: str) -> bool:
    return bool(atom) and all(c in _ATEXT or _is_utf8(c) for c in atom)


def is_dot_string(local: str) -> bool:
    return all(_atom_ok(atom) for atom in local.split("."))


def _unquote(local: str, addr: str) -> str:
    """The content of a Quoted-string local part (RFC 5321 QcontentSMTP)."""
    out = []
    i = 1
    end = len(local) - 1
    while i < end:
        ch = local[i]
        if ch == "\\":
            if i + 1 >= end or not (0x20 <= ord(local[i + 1]) <= 0x7E):
                raise AddressError(f"address <{printable(addr)}>: a backslash in the quoted "
                                   "local part must escape a printable character")
            out.append(local[i + 1])
            i += 2
            continue
        if ch == '"':
            raise AddressError(f"address <{printable(addr)}>: a quote inside the quoted local "
                               "part must be escaped")
        if not (0x20 <= ord(ch) <= 0x7E or _is_utf8(ch)):
            raise AddressError(f"address <{printable(addr)}>: control character in the "
                               "local part")
        out.append(ch)
        i += 1
    return "".join(out)


def quote_local(content: str) -> str:
    """The local part as sent: bare when a Dot-string, else a minimal Quoted-string."""
    if is_dot_string(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_domain(domain: str, addr: str) -> str:
    what = f"address <{printable(addr)}>"
    if not domain:
        raise AddressError(f"{what}: no domain after '@'")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError(f"{what}: the domain is longer than {MAX_DOMAIN} octets")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError(f"{what}: unterminated address literal")
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressError(f"{what}: {domain} is not an IPv4 or IPv6 address "
                               "literal") from None
        return domain
    for label in domain.split("."):
        if not label or len(label) > 63:
            raise AddressError(f"{what}: the domain has an empty or over-long label")
        if not all(c in _LDH or _is_utf8(c) for c in label) or label[0] == "-" \
                or label[-1] == "-":
            raise AddressError(f"{what}: the domain may contain only letters, digits, "
                               "hyphens and dots")
    if not domain.isascii():
        try:
            domain.encode("idna")
        except UnicodeError:
            raise AddressError(f"{what}: the domain is not a valid internationalized "
                               "domain name") from None
    return domain


def canonical(addr: str) -> str:
    """The mailbox in the form we keep and send; AddressError when it is not one."""
    text = addr.strip()
    if not text:
        raise AddressError("empty address")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise AddressError(f"address <{printable(text)}> is not valid UTF-8")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise AddressError(f"address <{printable(text)}> contains a control character")
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError(f"address <{printable(text)}> has no '@domain'")
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        content = _unquote(local, text)
    elif is_dot_string(local):
        content = local
    else:
        raise AddressError(f"address <{printable(text)}>: the local part is neither a "
                           "dot-separated word list nor a quoted string (RFC 5321 4.1.2)")
    if not content:
        raise AddressError(f"address <{printable(text)}>: empty local part")
    wire_local = quote_local(content)
    if len(wire_local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError(f"address <{printable(text)}>: the local part is longer than "
                           f"{MAX_LOCAL} octets")
    domain = check_domain(domain, text)
    result = f"{wire_local}@{domain}"
    if len(result.encode("utf-8")) + 2 > MAX_PATH:
        raise AddressError(f"address <{printable(text)}> is longer than {MAX_PATH - 2} octets")
    return result


def smtp_path(addr: str) -> str:
    """``<mailbox>`` for MAIL FROM / RCPT TO; ``<>`` for the null sender."""
    return "<>" if addr == "" else f"<{canonical(addr)}>"


def needs_smtputf8(*addresses: str) -> bool:
    return not all(a.isascii() for a in addresses)


def paths_for(sender: str, recipients: list[str]
              ) -> tuple[str, dict[str, str], dict[str, str]]:
    """The sender's path, each sendable recipient's path, and why the others are not.

    A sender that is not sendable makes every recipient unsendable (sender path "").
    """
    try:
        sender_path = smtp_path(sender)
    except AddressError as exc:
        return "", {}, dict.fromkeys(recipients, f"sender: {exc}")
    paths: dict[str, str] = {}
    errors: dict[str, str] = {}
    for rcpt in recipients:
        try:
            paths[rcpt] = smtp_path(rcpt)
        except AddressError as exc:
            errors[rcpt] = str(exc)
    return sender_path, paths, errors
