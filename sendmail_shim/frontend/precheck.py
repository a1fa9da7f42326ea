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

Trusts: nothing.  Imported only on the drop road (the daemon unreachable), so
the hot path (the socket road) pays nothing for it; it uses the stdlib's
``email.utils`` and the pure-stdlib ``store.address`` and ``store.headers``
(pyproject.toml lists these imports as the front end's exceptions).
"""

from __future__ import annotations

import re
from email.utils import getaddresses

from sendmail_shim.frontend.argv import Invocation
from sendmail_shim.store.address import AddressError, canonical, printable
from sendmail_shim.store.headers import header_name, header_value, split_header_block
from sendmail_shim.wire.protocol import MAX_ENVID, bad_envid

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_EXTRACTED = ("to", "cc", "bcc")


def _addresses(text: str, what: str) -> list[str]:
    if _CONTROL.search(text):
        raise AddressError(f"bad {what} address {printable(text, 80)!r}: control characters "
                           "are not allowed")
    return [addr for _name, addr in getaddresses([text]) if addr]


def _check(addr: str, what: str) -> None:
    try:
        canonical(addr if "@" in addr else f"{addr}@localhost")
    except AddressError as exc:
        raise AddressError(f"bad {what} address: {exc}") from None


def problem(inv: Invocation, message: bytes) -> str | None:
    """Why the daemon would refuse this submission whatever its policy; None if it may not."""
    if inv.envid is not None and bad_envid(inv.envid):
        return (f"bad envelope id (-V) {printable(inv.envid, 40)!r}: use at most {MAX_ENVID} "
                "printable ASCII characters without spaces")
    try:
        sender = (inv.sender or "").strip()
        if sender not in ("", "<>"):
            found = _addresses(sender, "sender")
            if not found:
                return f"cannot read the sender address <{printable(sender, 80)}>"
            _check(found[0], "sender")
        recipients: list[str] = []
        for word in inv.recipients:
            recipients.extend(_addresses(word, "recipient"))
        if inv.extract:
            headers, _rest = split_header_block(message)
            names = [header_name(field) for field in headers]
            resent = any(name.startswith("resent-") for name in names)
            wanted = tuple("resent-" + n for n in _EXTRACTED) if resent else _EXTRACTED
            for field, name in zip(headers, names, strict=True):
                if name in wanted:
                    recipients.extend(_addresses(header_value(field), "recipient"))
        for addr in recipients:
            _check(addr, "recipient")
    except AddressError as exc:
        return str(exc)
    if not recipients:
        return ("No recipient addresses found in message header" if inv.extract
                else "no recipient addresses given")
    return None
