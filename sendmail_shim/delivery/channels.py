"""A lane's sessions: opened lazily, one per relay pool, shared by the lane's messages.

Trusts: the session openers it is given (relay.py's ``open_session``, local.py's
``open_local_session``) and their sessions' per-recipient outcomes.
Guarantees: a session is opened at the first message that needs it, never before;
a session that cannot be opened makes every later message of the lane wait with
the same reason (one knock per lane, not one per message); a session that broke
mid-transaction is closed and the next message opens a new one; a site's messages
in different pools never share a session (:class:`Pools`), and a pool's session is
replaced when its set of active relays changes (a burn or a restore).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from sendmail_shim.config import Relay
from sendmail_shim.delivery.local import Session
from sendmail_shim.delivery.relay import RelaysUnavailable, SessionBroken
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import Outcome


class Channel:
    """One lazily opened session (the relay as a site, or the local MTA) for a batch.

    A session that cannot be opened makes every later message of the batch wait
    with the same reason, instead of knocking again for each one.
    """

    def __init__(self, opener: Callable[[], Awaitable[Session]]) -> None:
        self.opener = opener
        self.session: Session | None = None
        self.down: Outcome | None = None
        self.kept = False  # kept from an earlier lane: checked before its next message

    async def send(self, env: Envelope, message: bytes,
                   recipients: list[str]) -> dict[str, Outcome]:
        if not recipients:
            return {}
        if self.down is not None:
            return dict.fromkeys(recipients, self.down)
        if self.kept:
            self.kept = False
            if self.session is not None and not await self.session.usable():
                await self._drop()  # the relay ended it meanwhile: a new one below
        if self.session is None:
            try:
                self.session = await self.opener()
            except RelaysUnavailable as exc:
                self.down = exc.outcome
                return dict.fromkeys(recipients, exc.outcome)
        try:
            return await self.session.send(env, message, recipients)
        except (SessionBroken, OSError, TimeoutError) as exc:
            await self._drop()
            return dict.fromkeys(recipients, Outcome.network(f"connection lost: {exc}"))
        except Exception:
            # This message broke the client mid-transaction: its state is unknown, so the
            # next message gets a new session; the runner records this one's failure.
            await self._drop()
            raise

    async def _drop(self) -> None:
        broken, self.session = self.session, None
        if broken is not None:
            with contextlib.suppress(Exception):
                await broken.close()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class Pools:
    """A lane's relay channels, one per pool (policy/relays.py): a site's messages in
    different pools never share a session.  A channel is opened for the pool's active
    relays; when that set changes (a relay burned or restored) the old session ends
    and the next message opens one on the new set."""

    def __init__(self, opener: Callable[[str, tuple[Relay, ...]], Awaitable[Session]]) -> None:
        self.opener = opener
        self.channels: dict[str, tuple[tuple[Relay, ...], Channel]] = {}

    async def channel(self, pool: str, active: tuple[Relay, ...]) -> Channel:
        held = self.channels.get(pool)
        if held is not None and held[0] == active:
            return held[1]
        if held is not None:
            await held[1].close()
        opener = self.opener
        channel = Channel(lambda: opener(pool, active))
        self.channels[pool] = (active, channel)
        return channel

    def keepable(self) -> bool:
        """Ready to be kept for the site's next lane: the channels that have a live
        session stay (marked to be checked first), the others are forgotten."""
        live = {pool: held for pool, held in self.channels.items()
                if held[1].session is not None and held[1].down is None}
        self.channels = live
        for _active, channel in live.values():
            channel.kept = True
        return bool(live)

    async def close(self) -> None:
        for _active, channel in self.channels.values():
            await channel.close()

