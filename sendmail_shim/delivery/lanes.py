"""One queue run's work: per-site queues served round-robin by sessions ("lanes").

Trusts: nothing outside the runner (it holds queue ids and site names only).
Guarantees (the fairness the runner keeps with it): each site has its own work
queue; sites get sessions round-robin, least recently served first; at most
:data:`MAX_PARALLEL_SITES` sites and :data:`MAX_SESSIONS` sessions at once.  A site
with a long queue gets one more session per :data:`LANE_BATCH` waiting messages (up
to its relays' ``sessions``) only while no other site waits; a session gives way to
a waiting site after its message in hand (at once when its site holds several,
else after :data:`LANE_TURN` messages).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass, field

MAX_PARALLEL_SITES = 8  # sites delivered at once
MAX_SESSIONS = 20  # relay sessions open at once, all sites together (Postfix: 20 per destination)
LANE_BATCH = 4  # a site gets one more session (up to its relay's ``sessions``) per 4 queued
LANE_TURN = 20  # messages a session sends before it gives way to a site waiting for one


@dataclass
class Run:
    """One queue run: per-site work queues served round-robin by sessions ("lanes")."""

    queues: dict[str, deque[tuple[str, str]]] = field(default_factory=dict)
    order: deque[str] = field(default_factory=deque)  # sites, least recently served first
    lanes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    taken: int = 0  # messages taken into this run
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a look at incoming/ ended
    refilling: bool = False  # a look at incoming/ is under way

    def add(self, due: dict[str, list[tuple[str, str]]]) -> None:
        for site, items in due.items():
            if site not in self.queues:
                self.queues[site] = deque()
                self.order.append(site)
            self.queues[site].extend(items)
            self.taken += len(items)

    def queued(self) -> int:
        """Messages taken into the run and not yet in a session's hands."""
        return sum(map(len, self.queues.values()))

    def active_sites(self) -> int:
        return sum(1 for n in self.lanes.values() if n)

    def full(self) -> bool:
        return len(self.tasks) >= MAX_SESSIONS or self.active_sites() >= MAX_PARALLEL_SITES

    def waiting(self, besides: str) -> bool:
        """Another site has mail queued in this run and no session."""
        return any(q and not self.lanes[s] for s, q in self.queues.items() if s != besides)

