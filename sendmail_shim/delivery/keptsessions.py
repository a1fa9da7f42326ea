"""Relay sessions kept between a site's lanes: Postfix's connection cache.

Trusts: the :class:`~sendmail_shim.delivery.channels.Pools` handed in (live sessions
of one site under one configuration).
Guarantees: a kept session is given only to a lane of the same site under the same
configuration object (a reload changes logins and relays: the old ones are closed);
it is closed :data:`IDLE_SESSION` seconds after its lane (Postfix's
``smtp_connection_cache_time_limit``, 2 s), and the oldest are closed first so that
kept sessions and lanes together stay within the runner's session bound; a session
whose relay was down is never kept; at shutdown every kept session's QUIT may take
at most :data:`CLOSE_WAIT` seconds.  A lane checks a kept session with RSET before
its next message (channels.py).
"""

from __future__ import annotations

import asyncio
import logging

from sendmail_shim.config import Config
from sendmail_shim.delivery.channels import Pools

log = logging.getLogger(__name__)
IDLE_SESSION = 2.0  # seconds a relay session is kept after its lane (Postfix: 2 s)
CLOSE_WAIT = 1.0  # seconds the kept sessions' QUITs may take at shutdown


class IdleSessions:
    """Relay sessions kept after their lane, per site, for :data:`IDLE_SESSION` seconds.

    A kept entry is a lane's :class:`Pools` with the configuration it was opened under;
    :meth:`take` gives it only to a lane of the same site under the same configuration
    object (a reload changes logins and relays: the old ones are closed).
    """

    def __init__(self) -> None:
        self.enabled = False  # run_forever's: a lone run_once closes its sessions
        self.kept: dict[str, list[tuple[Pools, Config, float]]] = {}
        self.closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """Relay sessions kept (a kept lane may hold one per pool)."""
        return sum(len(pools.channels) for entries in self.kept.values()
                   for pools, _config, _deadline in entries)

    def take(self, site: str, config: Config) -> Pools | None:
        entries = self.kept.get(site)
        found = None
        while entries and found is None:
            pools, kept_config, _deadline = entries.pop()
            if kept_config is config:
                found = pools
            else:
                self._close(pools)
        if not entries:
            self.kept.pop(site, None)
        return found

    def keep(self, site: str, config: Config, pools: Pools, room: int) -> bool:
        """Keep ``pools`` for the site's next lane, within ``room`` sessions kept in all
        (the oldest others are closed); False when it is not kept (the caller closes it)."""
        if not self.enabled or room <= 0 or not pools.keepable():
            return False
        loop = asyncio.get_running_loop()
        self.kept.setdefault(site, []).append((pools, config, loop.time() + IDLE_SESSION))
        self.trim(room)
        loop.call_later(IDLE_SESSION, self.expire)
        return True

    def trim(self, room: int) -> list[asyncio.Task[None]]:
        """Close the oldest kept sessions until at most ``room`` remain: kept sessions and
        lanes together stay within the runner's ``MAX_SESSIONS``.  The closing tasks."""
        tasks = []
        while self.kept and len(self) > max(0, room):
            oldest = min(self.kept, key=lambda s: self.kept[s][0][2])
            tasks.append(self._close(self.kept[oldest].pop(0)[0]))
            if not self.kept[oldest]:
                del self.kept[oldest]
        return tasks

    async def make_room(self, room: int) -> None:
        """Trim to ``room`` and wait for those sessions to end (at most CLOSE_WAIT): a new
        session opens only after the kept ones it replaces are gone."""
        tasks = self.trim(room)
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT)

    def expire(self) -> None:
        """Close the sessions unused for :data:`IDLE_SESSION` seconds (a timer may fire a
        little early: a small slack, so none is left until the next keep)."""
        now = asyncio.get_running_loop().time() + 0.05
        for site in list(self.kept):
            entries = self.kept[site]
            for entry in [e for e in entries if e[2] <= now]:
                entries.remove(entry)
                self._close(entry[0])
            if not entries:
                del self.kept[site]

    def _close(self, pools: Pools) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(pools.close())
        self.closing.add(task)
        task.add_done_callback(self._closed)
        return task

    def _closed(self, task: asyncio.Task[None]) -> None:
        self.closing.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved: logged here
            log.warning("closing a kept relay session failed: %r", task.exception())

    async def close_all(self) -> None:
        """Close every kept session; QUITs a relay does not answer are cut after
        CLOSE_WAIT, so shutdown does not wait for it."""
        self.trim(0)
        if self.closing:
            _done, late = await asyncio.wait(list(self.closing), timeout=CLOSE_WAIT)
            for task in late:
                task.cancel()

