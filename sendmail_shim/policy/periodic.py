"""A background round repeated at an interval, or at once when poked (the daemon's watches).

Trusts: nothing.  Guarantees: :meth:`Periodic.run` awaits :meth:`Periodic.round`
(which must catch and log its own failures), then waits the seconds it returned
or until :meth:`poke`; :meth:`stop` ends the loop after the round in hand.
Used by the reputation watch (``delivery/reputation.py``) and the DKIM DNS
watch (``daemon/dkimwatch.py``).
"""

from __future__ import annotations

import asyncio


class Periodic:
    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def poke(self) -> None:
        """Run the next round now (a reload may have changed what it watches)."""
        self._wake.set()

    async def round(self) -> float:
        """One round; the seconds until the next."""
        raise NotImplementedError

    async def run(self) -> None:
        while not self._stopping:
            interval = await self.round()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
            self._wake.clear()
