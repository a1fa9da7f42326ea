"""The capture listener's attribution rule on crafted /proc rows (no network needed).

The end-to-end proofs, with real sites, REDIRECT and TIME_WAIT rows, are in
tests/test_firewall.py (TestCapture).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sendmail_shim.daemon.capture import (
    ESTABLISHED,
    NOT_PROVEN,
    NOT_REDIRECTED,
    Connection,
    Endpoint,
    Refused,
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
