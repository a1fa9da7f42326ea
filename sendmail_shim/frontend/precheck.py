"""What the front end checks itself before it takes the drop road.

A drop file is acknowledged with exit 0 before the daemon sees it; whatever
the daemon would refuse comes back later as a bounce, which a site's script
never sees.  So before writing a drop file the front end refuses, with exit 65
(EX_DATAERR) and the reason, what it can judge without the daemon, by the
daemon's own rules:

* ``-V``: the ENVID rule of ``wire.protocol.bad_envid``;
* no recipient at all (neither arguments nor, with ``-t``, To/Cc/Bcc or their
  Resent- forms);
* a recipient or ``-f`` address outside the one address grammar
  (``store.address.canonical``), or holding a control character.

Policy (site, quota, suspension, sender policy) needs the daemon's state and
configuration: what fails there is bounced by pickup (daemon/dropnotice.py).

Trusts: nothing.  Imported only on the drop road (the daemon unreachable),
and light there too: plain ``user@example.net`` addresses are seen to be valid
without a parser; anything else (a display name, a quoted local part, an
unusual character) goes through the stdlib's ``email.utils`` and the
pure-stdlib ``store.address``, loaded then only (pyproject.toml lists this
import as the front end's one exception besides -bs).
"""

from sendmail_shim.frontend.sendmail import Invocation
from sendmail_shim.wire.protocol import MAX_ENVID, bad_envid

_EXTRACTED = (b"to", b"cc", b"bcc")
_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+-_=")
_DOMAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")


def _header_values(message: bytes) -> list[str]:
    """The unfolded To/Cc/Bcc values (their Resent- forms when the message is resent)."""
    fields: list[bytes] = []
    for line in message.split(b"\n"):
        if not line.strip():
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        else:
            fields.append(line)
    named = [(f.split(b":", 1)[0].strip().lower(), f.split(b":", 1)[1]) for f in fields
             if b":" in f]
    resent = any(name.startswith(b"resent-") for name, _value in named)
    wanted = tuple(b"resent-" + n for n in _EXTRACTED) if resent else _EXTRACTED
    return [value.decode("utf-8", "surrogateescape") for name, value in named
            if name in wanted]


def _plain(word: str) -> bool:
    """``user@example.net`` (several, comma-separated): surely valid, no parser needed."""
    for part in word.split(","):
        local, at, domain = part.strip().rpartition("@")
        if not (at and local and domain and set(local) <= _LOCAL and set(domain) <= _DOMAIN
                and ".." not in part and not local.startswith(".") and not local.endswith(".")
                and not domain.startswith((".", "-")) and not domain.endswith((".", "-"))
                and len(local) <= 64 and len(domain) <= 253):
            return False
    return True


def problem(inv: Invocation, message: bytes) -> str | None:
    """Why the daemon would refuse this submission whatever its policy; None if it may not."""
    if inv.envid is not None and bad_envid(inv.envid):
        return (f"bad envelope id (-V) {inv.envid[:40]!r}: use at most {MAX_ENVID} "
                "printable ASCII characters without spaces")
    words = list(inv.recipients) + (_header_values(message) if inv.extract else [])
    sender = (inv.sender or "").strip()
    if sender in ("", "<>"):
        sender = ""
    if all(_plain(word) for word in words) and (not sender or _plain(sender)):
        if any(word.strip() for word in words):
            return None
        return _no_recipient(inv)
    return _parsed_problem(inv, words, sender)


def _no_recipient(inv: Invocation) -> str:
    return ("No recipient addresses found in message header" if inv.extract
            else "no recipient addresses given")


def _parsed_problem(inv: Invocation, words: list[str], sender: str) -> str | None:
    """The full check, by the daemon's grammar: only for what is not plainly an address."""
    import re
    from email.utils import getaddresses

    from sendmail_shim.store.address import AddressError, canonical, printable

    control = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

    def addresses(text: str, what: str) -> list[str]:
        if control.search(text):
            raise AddressError(f"bad {what} address {printable(text, 80)!r}: control "
                               "characters are not allowed")
        return [addr for _name, addr in getaddresses([text]) if addr]

    def check(addr: str, what: str) -> None:
        try:
            canonical(addr if "@" in addr else f"{addr}@localhost")
        except AddressError as exc:
            raise AddressError(f"bad {what} address: {exc}") from None

    try:
        if sender:
            found = addresses(sender, "sender")
            if not found:
                return f"cannot read the sender address <{printable(sender, 80)}>"
            check(found[0], "sender")
        recipients = [addr for word in words for addr in addresses(word, "recipient")]
        for addr in recipients:
            check(addr, "recipient")
    except AddressError as exc:
        return str(exc)
    return None if recipients else _no_recipient(inv)
