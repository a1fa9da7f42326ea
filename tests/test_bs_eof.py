"""`sendmail -bs` when the client writes the whole dialogue at once and closes stdin."""

from __future__ import annotations

import pytest
from conftest import Relay, Shim


def dialogue(count: int, quit_: bool, unfinished: bool = False) -> bytes:
    lines = [b"EHLO client.test\r\n"]
    for n in range(count):
        lines += [b"MAIL FROM:<app@site1.test>\r\n", f"RCPT TO:<to{n}@x.test>\r\n".encode(),
                  b"DATA\r\n", f"Subject: eof {n}\r\n\r\nbody {n}\r\n.\r\n".encode()]
    if unfinished:
        lines += [b"MAIL FROM:<app@site1.test>\r\n", b"RCPT TO:<late@x.test>\r\n",
                  b"DATA\r\n", b"Subject: cut\r\n\r\nthe input ends here"]
    elif quit_:
        lines.append(b"QUIT\r\n")
    return b"".join(lines)


@pytest.mark.parametrize("quit_", [True, False], ids=["with-quit", "without-quit"])
def test_every_pipelined_transaction_is_answered_and_queued(system: tuple[Shim, Relay],
                                                            quit_: bool) -> None:
    shim, relay = system
    done = shim.sendmail(["-bs"], dialogue(5, quit_))
    out = done.stdout.decode()
    assert out.count("250 2.0.0 Ok: queued as") == 5, out
    assert out.count("354 ") == 5, out
    assert ("221 " in out) == quit_, out
    assert done.returncode == 0 and done.stderr == b""
    got = sorted(meta["rcpt_tos"][0] for meta, _ in relay.wait(5))
    assert got == [f"to{n}@x.test" for n in range(5)]


def test_input_ending_inside_a_transaction_is_a_failure(system: tuple[Shim, Relay]) -> None:
    shim, relay = system
    done = shim.sendmail(["-bs"], dialogue(2, False, unfinished=True))
    out = done.stdout.decode()
    assert out.count("250 2.0.0 Ok: queued as") == 2, out
    assert done.returncode == 75 and done.stderr == b""
    assert len(relay.wait(2)) == 2
    assert "late@x.test" not in shim.daemon_log()
