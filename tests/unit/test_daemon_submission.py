"""The hand-off server's mailq: a site uid gets one listing at a time (daemon/submission.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from sendmail_shim.config import Config
from sendmail_shim.daemon.sockets import Released, Streamed
from sendmail_shim.daemon.submission import SubmissionServer
from sendmail_shim.wire import paths

from .conftest import QueueMessage

SITE_UID = 5001


def server(config: Config) -> SubmissionServer:
    daemon = SimpleNamespace(config=config, state=None, runner=None, unavailable=None,
                             pickup_wake=asyncio.Event())
    return SubmissionServer(daemon)  # type: ignore[arg-type]


def test_a_site_uid_gets_one_listing_at_a_time(config: Config, spool_layout: paths.SpoolLayout,
                                               queue_message: QueueMessage) -> None:
    queue_message(uid=SITE_UID)
    submission = server(config)
    first = submission._mailq(SITE_UID, 1)
    assert isinstance(first, Streamed)
    second = submission._mailq(SITE_UID, 2)
    assert isinstance(second, bytes) and second.startswith(b"451 ")
    assert b"still being sent" in second
    other = submission._mailq(SITE_UID + 1, 3)  # another site is not held up
    assert isinstance(other, Streamed)
    assert b"".join(first.body)  # sent to the end: the uid may list again
    again = submission._mailq(SITE_UID, 4)
    assert isinstance(again, Streamed)
    again.body.close()  # closed without a step (the client went away): free as well
    assert isinstance(submission._mailq(SITE_UID, 5), Streamed)


def test_root_and_the_daemon_are_not_limited(config: Config,
                                             spool_layout: paths.SpoolLayout) -> None:
    submission = server(config)
    for uid in (0, os.getuid()):
        assert isinstance(submission._mailq(uid, 1), Streamed)
        assert isinstance(submission._mailq(uid, 2), Streamed)


def test_released_frees_once_on_end_failure_or_close() -> None:
    freed: list[int] = []

    def broken() -> Iterator[bytes]:
        raise OSError("disk")
        yield b""

    done = Released(iter([b"a"]), lambda: freed.append(1))
    assert list(done) == [b"a"]
    done.close()
    failing = Released(broken(), lambda: freed.append(2))
    with pytest.raises(OSError):
        next(failing)
    Released(iter([b"x"]), lambda: freed.append(3)).close()
    assert freed == [1, 2, 3]


# -- issue 21 finding 8: the accept loop reads the uid before it spends anything -----------
def test_accept_loop_queues_by_uid_and_refuses_past_the_share(
        make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from sendmail_shim.daemon import submission as module
    from sendmail_shim.wire import protocol

    from .conftest import prepare

    config = make_config(connections_per_uid=2)
    prepare(config.layout)
    # Each test client binds an abstract name that carries the uid the "kernel" reports.
    monkeypatch.setattr(module, "peer_credentials",
                        lambda conn: (1, int(conn.getpeername().split(b"-")[1]), 0))
    flush = protocol.encode_request([(protocol.MODE, protocol.FLUSH)], b"")

    async def connect(uid: int, n: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(f"\0shimtest-{uid}-{n}-{id(sock)}")
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, config.layout.socket)
        return sock

    async def reply(sock: socket.socket) -> bytes:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 500), 5)

    async def main() -> None:
        submission = server(config)
        listener = await submission.start()
        held = [await connect(5001, n) for n in range(2 * module.WAITING_FACTOR)]
        await asyncio.sleep(0.2)
        assert submission._active == {5001: 2}  # its slots; the rest wait as bare sockets
        assert len(submission._waiting[5001]) == 2 * module.WAITING_FACTOR - 2
        over = await connect(5001, 99)
        assert (await reply(over)).startswith(b"421 75 4.7.0 too many connections from uid 5001")
        other = await connect(5002, 0)  # another uid: served at once
        await asyncio.get_running_loop().sock_sendall(other, flush)
        assert (await reply(other)).startswith(b"250 ")
        for sock in held[:2]:  # the served two go away: the next two waiting are served
            sock.close()
        await asyncio.sleep(0.2)
        assert submission._active == {5001: 2}
        assert len(submission._waiting[5001]) == 2 * module.WAITING_FACTOR - 4
        await asyncio.get_running_loop().sock_sendall(held[2], flush)
        assert (await reply(held[2])).startswith(b"250 ")
        await asyncio.sleep(0.2)  # held[2] done: held[4] has its slot
        listener.close()  # stopping: the ones still waiting are told to try again
        assert (await reply(held[-1])).startswith(b"421 75 4.3.2 the daemon is stopping")
        assert submission._per_uid == {5001: 2}  # held[3] and [4], served, end with their task
        held[3].close()
        held[4].close()
        await asyncio.sleep(0.2)
        assert submission._per_uid == {} and submission._active == {}
        assert submission._connections == 0
        for sock in [*held, over, other]:
            sock.close()

    asyncio.run(main())
