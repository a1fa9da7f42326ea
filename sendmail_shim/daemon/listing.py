"""The queue as people read it: mailq / ``sendmail -bp`` / ``queue list`` text.

Trusts: the entries it is given (the caller decides what a user may see).
Guarantees: Postfix's mailq layout, widened with the site, the age and the
last error; a marker after the id tells the state (``!`` hold, ``#`` corrupt,
``~`` deferred, blank incoming); "Mail queue is empty" when there is nothing.
Every string from a queue file (site, sender, recipients, last error) is shown
through ``address.printable``: invalid UTF-8 and controls appear escaped
(``\\xff``), so one odd entry can never break the listing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sendmail_shim.store.address import printable
from sendmail_shim.store.spool import CORRUPT, DEFERRED, HOLD, QueueEntry

MARKERS = {HOLD: "!", CORRUPT: "#", DEFERRED: "~"}
RCPT_INDENT = " " * 57


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_queue(entries: Iterable[QueueEntry], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        "-Queue ID-------- --Size-- ---Age--- -Site---------------- -Sender/Recipient-------"
    ]
    count = total = 0
    for entry in entries:
        env = entry.envelope
        count += 1
        total += env.size
        marker = MARKERS.get(entry.state, " ")
        lines.append(
            f"{env.queue_id}{marker} {env.size:>8} {format_age(now - env.arrival):>9} "
            f"{printable(env.site, 21):<21} {printable(env.sender) or 'MAILER-DAEMON'}"
        )
        if entry.status.last_error:
            lines.append(f"{RCPT_INDENT}({printable(entry.status.last_error)})")
        pending = [r for r in env.recipients
                   if r not in entry.status.done and r not in entry.status.failed]
        lines.extend(f"{RCPT_INDENT}{printable(rcpt)}" for rcpt in pending)
        lines.append("")
    if count == 0:
        return "Mail queue is empty\n"
    kbytes = (total + 1023) // 1024
    lines.append(f"-- {kbytes} Kbytes in {count} Request{'s' if count != 1 else ''}.")
    return "\n".join(lines) + "\n"
