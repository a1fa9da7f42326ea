"""The queue as people read it: mailq / ``sendmail -bp`` / ``queue list`` text.

Trusts: the entries it is given (the caller decides what a user may see).
Guarantees: the text is produced entry by entry (:func:`queue_text`) and sent
in chunks (:func:`chunks`), so memory does not grow with the queue.  Postfix's
mailq layout, widened with the site, the age and the last error; a marker
after the id tells the state (``!`` hold, ``#`` corrupt, ``~`` deferred, blank
incoming); "Mail queue is empty" when there is nothing.  A scanned message
(delivery/scan.py) gets a line ``[score 3.3]`` (``[score 3.3 of its first part]``
when it was larger than scan.max_size, ``[unscored: scanner unavailable]``)
in the operator's listing only; an unscanned one none.  A site's own listing
(``operator=False``: ``sendmail -bp`` of a site uid) shows neither the score
nor the reason a message is held (a scan hold names the score and
``scan.max_score``), only "(held for the operator)": a site that could read its
scores against the limit could tune its spam until it passes (issue 21).
Every string from a queue file (site, sender, recipients, last error) is shown
through ``address.printable``: invalid UTF-8 and controls appear escaped
(``\\xff``), so one odd entry can never break the listing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from sendmail_shim.store.address import printable
from sendmail_shim.store.spool import (
    CORRUPT,
    DEFERRED,
    HOLD,
    SCANNED_OK,
    SCANNED_PARTIAL,
    SCANNED_SKIPPED,
    QueueEntry,
    Status,
)
from sendmail_shim.wire import protocol

MARKERS = {HOLD: "!", CORRUPT: "#", DEFERRED: "~"}
RCPT_INDENT = " " * 57
CHUNK = 1 << 16  # bytes of listing per socket write


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def score_text(status: Status) -> str:
    """The content score as the listing and ``queue show`` print it; "" when not scanned."""
    if status.scanned is None:
        return ""
    if status.scanned == SCANNED_OK and status.score is not None:
        return f"score {status.score:.1f}"
    if status.scanned == SCANNED_PARTIAL and status.score is not None:
        return f"score {status.score:.1f} of its first part (larger than scan.max_size)"
    if status.scanned == SCANNED_SKIPPED:
        return "unscored: too large to scan"
    return "unscored: scanner unavailable"


SITE_HOLD_REASON = "held for the operator"
HEADER = "-Queue ID-------- --Size-- ---Age--- -Site---------------- -Sender/Recipient-------\n"
EMPTY = "Mail queue is empty\n"


def queue_text(entries: Iterable[QueueEntry], now: float | None = None,
               operator: bool = True) -> Iterator[str]:
    """The listing, one piece per entry as the entries come: nothing is held but one entry.

    ``operator`` False: a site's view, without content scores and hold reasons.

    The header comes with the first entry and the total line after the last,
    so a listing of 100,000 messages never exists whole in memory.
    """
    now = time.time() if now is None else now
    count = total = 0
    for entry in entries:
        env = entry.envelope
        if count == 0:
            yield HEADER
        count += 1
        total += env.size
        marker = MARKERS.get(entry.state, " ")
        lines = [f"{env.queue_id}{marker} {env.size:>8} {format_age(now - env.arrival):>9} "
                 f"{printable(env.site, 21):<21} {printable(env.sender) or 'MAILER-DAEMON'}"]
        status = entry.status
        error = status.last_error
        if error and not operator and entry.state == HOLD:
            error = SITE_HOLD_REASON  # the reason may name the score and the limit
        if error:
            lines.append(f"{RCPT_INDENT}({printable(error)})")
        if operator and status.scanned is not None:
            lines.append(f"{RCPT_INDENT}[{score_text(status)}]")
        lines.extend(f"{RCPT_INDENT}{printable(rcpt)}" for rcpt in env.recipients
                     if rcpt not in status.done and rcpt not in status.failed)
        lines.append("\n")
        yield "\n".join(lines)
    if count == 0:
        yield EMPTY
        return
    kbytes = (total + 1023) // 1024
    yield f"-- {kbytes} Kbytes in {count} Request{'s' if count != 1 else ''}.\n"


def chunks(pieces: Iterable[str], size: int = CHUNK) -> Iterator[bytes]:
    """``pieces`` encoded as a reply body (``protocol.encode_body``), about ``size`` bytes each."""
    buffer: list[str] = []
    held = 0
    for piece in pieces:
        buffer.append(piece)
        held += len(piece)
        if held >= size:
            yield protocol.encode_body("".join(buffer))
            buffer.clear()
            held = 0
    if buffer:
        yield protocol.encode_body("".join(buffer))
