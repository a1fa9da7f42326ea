"""delivery/loopback.py: the owner of a server's accepted socket on a local address."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from sendmail_shim.delivery import loopback


async def _dial(trusted: set[int] | None, greet: bool = True) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greet:
            writer.write(b"220 hi\r\n")
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()  # the greeting: the server has accepted
        sock = writer.get_extra_info("socket")
        local, uid = loopback.server_owner(sock)
        assert local and uid == os.geteuid()  # this process accepted it
        if trusted is not None:
            loopback._Trust.extra = frozenset()
            real = loopback.trusted_uids
            loopback.trusted_uids = lambda extra=None: trusted  # type: ignore[assignment]
            try:
                await loopback.prove_server(sock, "127.0.0.1:%d" % port)
            finally:
                loopback.trusted_uids = real  # type: ignore[assignment]
        else:
            await loopback.prove_server(sock, "127.0.0.1:%d" % port)
    finally:
        writer.close()
        server.close()


def test_a_server_of_our_own_user_is_trusted() -> None:
    asyncio.run(_dial(None))


def test_a_server_of_another_uid_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(loopback.UntrustedServer, match="belongs to uid"):
        asyncio.run(_dial({os.geteuid() + 4242}))
    assert "loopback_server_untrusted" in caplog.text and "suspend" in caplog.text


def test_a_unix_socket_is_not_looked_at() -> None:
    with socket.socket(socket.AF_UNIX) as unix:
        assert loopback.server_owner(unix) == (False, None)


def test_no_socket_is_refused() -> None:
    with pytest.raises(loopback.UntrustedServer):
        asyncio.run(loopback.prove_server(None, "127.0.0.1:1"))
