"""The capture listener's attribution rule on crafted /proc rows (no network needed).

The end-to-end proofs, with real sites, REDIRECT and TIME_WAIT rows, are in
tests/test_firewall.py (TestCapture).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sendmail_shim.daemon import capture
from sendmail_shim.daemon.capture import (
    ESTABLISHED,
    NOT_PROVEN,
    NOT_REDIRECTED,
    Connection,
    Endpoint,
    PerUid,
    Prover,
    Refused,
    SlotTimeout,
    TcpRow,
    endpoint,
    prove_owner,
    tcp_rows,
)

TIME_WAIT = 0x06
PEER = endpoint("10.201.0.1", 40000)
LISTENER = endpoint("127.0.0.1", 10025)
ORIGINAL = endpoint("10.201.0.2", 25)
CONN = Connection(PEER, LISTENER, ORIGINAL, inode=500)
OURS = TcpRow(LISTENER, PEER, ESTABLISHED, uid=110, inode=500)
SITE = TcpRow(PEER, ORIGINAL, ESTABLISHED, uid=1001, inode=700)
NEVER = frozenset({0, 110})


def refusal(conn: Connection, rows: list[TcpRow]) -> tuple[str, str]:
    with pytest.raises(Refused) as info:
        prove_owner(conn, rows, NEVER)
    return info.value.reply, info.value.reason


def test_the_exact_connection_is_attributed() -> None:
    decoy = TcpRow(PEER, endpoint("127.0.0.1", 22), TIME_WAIT, uid=0, inode=0)
    other = TcpRow(PEER, endpoint("10.201.0.3", 25), ESTABLISHED, uid=0, inode=9)
    owner = prove_owner(CONN, [decoy, other, OURS, SITE], NEVER)
    assert (owner.uid, owner.inode) == (1001, 700)


@pytest.mark.parametrize("original", [None, LISTENER])
def test_not_redirected_is_refused(original: Endpoint | None) -> None:
    conn = Connection(PEER, LISTENER, original, inode=500)
    reply, reason = refusal(conn, [OURS, TcpRow(PEER, LISTENER, ESTABLISHED, 1001, 700)])
    assert reply == NOT_REDIRECTED and reply.startswith("554 5.7.1")
    assert reason.startswith("not redirected")


@pytest.mark.parametrize("rows,why", [
    ([OURS], "0 client sockets"),
    ([OURS, TcpRow(PEER, ORIGINAL, TIME_WAIT, 0, 0)], "not established"),
    ([OURS, TcpRow(PEER, ORIGINAL, ESTABLISHED, 0, 0)], "inode 0"),
    ([OURS, SITE, TcpRow(PEER, ORIGINAL, ESTABLISHED, 0, 9)], "2 client sockets"),
    ([SITE], "our own socket"),
    ([TcpRow(LISTENER, PEER, ESTABLISHED, 110, 501), SITE], "our own socket"),
])
def test_an_unprovable_owner_is_refused_never_guessed(rows: list[TcpRow], why: str) -> None:
    reply, reason = refusal(CONN, rows)
    assert reply == NOT_PROVEN and reply.startswith("421 4.7.0")
    assert why in reason


def test_uids_the_firewall_exempts_are_refused() -> None:
    reply, reason = refusal(CONN, [OURS, TcpRow(PEER, ORIGINAL, ESTABLISHED, 0, 700)])
    assert reply.startswith("554 5.7.1") and "uid 0 is exempt" in reason


def test_proc_rows_decode_both_families_and_mapped_addresses(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt" \
             "   uid  timeout inode\n"
    v4 = os.path.join(tmp_path, "tcp")
    with open(v4, "w") as fh:
        fh.write(header + "   0: 0100C90A:9C40 0200C90A:0019 01 00000000:00000000 00:00000000 "
                 "00000000  1001        0 700 1 0 20 0 0 10 -1\n")
    v6 = os.path.join(tmp_path, "tcp6")
    with open(v6, "w") as fh:
        fh.write(header + "   0: 0000000000000000FFFF00000100C90A:9C41 "
                 "0000000000000000FFFF00000200C90A:0019 06 00000000:00000000 03:00001770 "
                 "00000000     0        0 0 3 0\n"
                 "   1: 00000000000000000000000001000000:2729 "
                 "00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 "
                 "00000000   110        0 42 1 0\n")
    rows = tcp_rows((v4, v6, os.path.join(tmp_path, "absent6")))
    assert rows[0] == TcpRow(PEER, ORIGINAL, ESTABLISHED, 1001, 700)
    assert rows[1] == TcpRow(endpoint("10.201.0.1", 40001), ORIGINAL, TIME_WAIT, 0, 0)
    assert rows[2].local == endpoint("::1", 10025) and rows[2].uid == 110
    with pytest.raises(FileNotFoundError):
        tcp_rows((os.path.join(tmp_path, "absent"),))


def test_one_proc_read_proves_every_connection_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21, finding 6: 300 connections of one site cost a read or two, not 300, so
    another site's connection waits for at most two reads whatever the flood."""
    conns = [Connection(endpoint("10.201.0.1", 40000 + n), LISTENER, ORIGINAL, inode=500 + n)
             for n in range(300)]
    rows = [row for n, conn in enumerate(conns) for row in (
        TcpRow(LISTENER, conn.peer, ESTABLISHED, uid=110, inode=500 + n),
        TcpRow(conn.peer, ORIGINAL, ESTABLISHED, uid=1001 + n % 2, inode=9000 + n))]
    reads = []
    monkeypatch.setattr(capture, "tcp_rows", lambda: reads.append(1) or rows)

    def no_sock_diag(local: object, remote: object) -> None:
        raise OSError("sock_diag unavailable")  # the kernel does not answer: /proc it is

    monkeypatch.setattr(capture, "diag_row", no_sock_diag)
    assert asyncio.run(_prove_all(conns)) == [1001 + n % 2 for n in range(300)]
    assert len(reads) <= 2


async def _prove_all(conns: list[Connection]) -> list[int]:
    prover = Prover(lambda: NEVER)
    owners = await asyncio.gather(*(prover.owner(conn) for conn in conns))
    return [owner.uid for owner in owners]


def test_sock_diag_proves_without_reading_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh attack F6: reading /proc/net/tcp grows with every socket the sites hold
    (60 ms under a 16,000-socket flood); a four-tuple lookup does not, so /proc is not
    read at all when the kernel answers."""
    conns = [Connection(endpoint("10.201.0.1", 40000 + n), LISTENER, ORIGINAL, inode=500 + n)
             for n in range(50)]
    rows = {(row.local, row.remote): row for n, conn in enumerate(conns) for row in (
        TcpRow(LISTENER, conn.peer, ESTABLISHED, uid=110, inode=500 + n),
        TcpRow(conn.peer, ORIGINAL, ESTABLISHED, uid=1001 + n % 2, inode=9000 + n))}

    def proc_read() -> list[TcpRow]:
        raise AssertionError("/proc/net/tcp read although sock_diag answered")

    monkeypatch.setattr(capture, "tcp_rows", proc_read)
    monkeypatch.setattr(capture, "diag_row", lambda local, remote: rows.get((local, remote)))
    assert asyncio.run(_prove_all(conns)) == [1001 + n % 2 for n in range(50)]
    unknown = Connection(endpoint("10.201.0.9", 41000), LISTENER, ORIGINAL, inode=77)
    with pytest.raises(Refused):
        asyncio.run(_prove_all([unknown]))


def test_a_uid_waits_only_for_its_own_slots() -> None:
    async def scenario() -> tuple[bool, int]:
        shares = PerUid()
        held = asyncio.Event()

        async def hog() -> None:
            async with shares.slot(1001, 1):
                held.set()
                await asyncio.sleep(10)

        hogging = asyncio.create_task(hog())
        await held.wait()
        async with shares.slot(1002, 1, wait=1.0):  # another uid: at once
            other = True
        try:
            async with shares.slot(1001, 1, wait=0.05):
                pass
            timed_out = False
        except SlotTimeout:
            timed_out = True
        open_then = shares.open(1001)
        hogging.cancel()
        await asyncio.gather(hogging, return_exceptions=True)
        assert shares.open(1001) == 0 and shares.open(1002) == 0  # forgotten
        return other and timed_out, open_then

    assert asyncio.run(scenario()) == (True, 1)
