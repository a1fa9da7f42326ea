"""The spool's space, shared: when it runs low, one site cannot take the rest of it.

A site with no quota (or a generous one) can have the daemon accept message
after message while the relay is slow or down, until the spool's file system is
full and every other site's hand-off gets 451 / exit 75 (issue 21, fresh attack:
25 accepted messages of one site filled a 40 MB spool).  Postfix refuses
everyone alike below ``queue_minfree``; here the site that holds the space is
the one refused:

* while the file system holding the spool has at least LOW_WATER free
  (:func:`low_water`: four messages of ``message_size_limit`` or a tenth of the
  file system, the larger), nothing is checked but one ``statvfs``;
* below it, a site whose queued messages (``incoming/``, ``deferred/``,
  ``hold/``: the envelopes' sizes) and this one together pass its share
  (``spool_site_share`` of the file system, at least two messages of
  ``message_size_limit``) gets ``451 4.3.1`` (exit 75: the message waits at
  the caller, or as a drop file, which pickup tries again); the other sites'
  mail is still accepted into the space left.

The per-site sums are read from the spool (``spool.entries``) only while space
is low, at most once per USAGE_TTL seconds, and raised by each message accepted
meanwhile (:func:`note_queued`), so a burst cannot slip past a stale sum.
Trusts: the kernel's statvfs and the daemon's own queue files.  Guarantees: a
verdict costs one statvfs while space is plentiful; never refuses a site below
its share; bounces and notices (queued by the runner, not by intake) are never
refused here.
"""

from __future__ import annotations

import os
import threading
import time

from sendmail_shim.config import Config
from sendmail_shim.store import outcome, spool

USAGE_TTL = 5.0  # seconds a per-site sum of the queue is used before it is read again
_QUEUED_STATES = (spool.INCOMING, spool.DEFERRED, spool.HOLD)
_lock = threading.Lock()
_usage: dict[str, tuple[float, dict[str, int]]] = {}  # spool root -> (read at, site -> bytes)


def low_water(config: Config, total: int) -> int:
    """Free bytes below which the shares are enforced."""
    return max(4 * config.message_size_limit, total // 10)


def share(config: Config, total: int) -> int:
    """Bytes of queued mail one site may hold while space is low."""
    return max(2 * config.message_size_limit, int(total * config.spool_site_share))


def _queued_by_site(config: Config) -> dict[str, int]:
    usage: dict[str, int] = {}
    for entry in spool.entries(config.layout, _QUEUED_STATES):
        envelope = entry.envelope
        usage[envelope.site] = usage.get(envelope.site, 0) + envelope.size
    return usage


def _usage_now(config: Config) -> dict[str, int]:
    root = config.layout.root
    with _lock:
        kept = _usage.get(root)
        if kept is not None and time.monotonic() - kept[0] < USAGE_TTL:
            return kept[1]
    usage = _queued_by_site(config)  # outside the lock: other sites' checks do not wait
    with _lock:
        _usage[root] = (time.monotonic(), usage)
    return usage


def over_share(config: Config, site: str, size: int) -> outcome.Verdict | None:
    """451 4.3.1 when space is low and ``site`` would pass its share; None to go on."""
    try:
        fs = os.statvfs(config.layout.root)
    except OSError:
        return None  # the commit will say what is wrong with the disk
    total = fs.f_blocks * fs.f_frsize
    free = fs.f_bavail * fs.f_frsize
    if free - size >= low_water(config, total):
        return None
    held = _usage_now(config).get(site, 0)
    allowed = share(config, total)
    if held + size <= allowed:
        return None
    return outcome.tempfail(
        f"site {site}: the spool's disk is nearly full ({free // 1024} KiB free) and this "
        f"site's queued mail ({held // 1024} KiB) would pass its share ({allowed // 1024} KiB, "
        "spool_site_share); nothing was queued, try again later. The operator sees it with "
        f"'sendmail-shim-admin queue list --site {site}'", "4.3.1")


def note_queued(config: Config, site: str, size: int) -> None:
    """Count a message just committed into a kept sum (none kept: nothing to do)."""
    with _lock:
        kept = _usage.get(config.layout.root)
        if kept is not None:
            kept[1][site] = kept[1].get(site, 0) + size
